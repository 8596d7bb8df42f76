"""The collectives of a step read from optimized HLO text: loops, async pieces, reduce-scatter
fusions (the forms XLA:TPU writes; the compiled ones are in aot_test.py)."""

from guidedflow import hlo_collectives

# A loop of 4 iterations whose body all-gathers a weight asynchronously (start and continuation
# repeat the op under one channel) and reduce-scatters its gradient through XLA:TPU's fusion; the
# entry all-reduces a loss and its gradient norm (a tuple) and permutes a buffer.
HLO = """HloModule jit_step, entry_computation_layout={()->()}

%add (x: f32[], y: f32[]) -> f32[] {
  %x = f32[] parameter(0)
  %y = f32[] parameter(1)
  ROOT %add = f32[] add(%x, %y)
}

%all-reduce-scatter.1 (input: f32[256,1024]) -> f32[64,1024] {
  %input = f32[256,1024]{1,0} parameter(0)
  %all-reduce.4 = f32[256,1024]{1,0:T(8,128)} all-reduce(%input), channel_id=6, replica_groups={{0,1,2,3}}, to_apply=%add
  %offset = s32[] constant(0)
  ROOT %dynamic-slice.39 = f32[64,1024]{1,0:T(8,128)} dynamic-slice(%all-reduce.4, %offset, %offset), dynamic_slice_sizes={64,1024}
}

%start_fusion (p: bf16[1,64,1024]) -> bf16[1,256,1024] {
  %p = bf16[1,64,1024]{2,1,0} parameter(0)
  ROOT %all-gather.19 = bf16[1,256,1024]{2,1,0:T(8,128)(2,1)} all-gather(%p), channel_id=8, dimensions={1}, metadata={op_name="jit(step)/while/body/dot_general"}
}

%continuation_fusion (p: bf16[1,64,1024]) -> bf16[1,256,1024] {
  %p = bf16[1,64,1024]{2,1,0} parameter(0)
  ROOT %all-gather.21 = bf16[1,256,1024]{2,1,0:T(8,128)(2,1)S(1)} all-gather(%p), channel_id=8, dimensions={1}
}

%body (param: (s32[], f32[256,1024])) -> (s32[], f32[256,1024]) {
  %param = (s32[], f32[256,1024]) parameter(0)
  %i = s32[] get-tuple-element(%param), index=0
  %g = f32[256,1024]{1,0} get-tuple-element(%param), index=1
  %w = bf16[1,64,1024]{2,1,0} bitcast(%g)
  %started = bf16[1,256,1024]{2,1,0} fusion(%w), kind=kCustom, calls=%start_fusion
  %continued = bf16[1,256,1024]{2,1,0} fusion(%w), kind=kCustom, calls=%continuation_fusion
  %scattered = f32[64,1024]{1,0} fusion(%g), kind=kCustom, calls=%all-reduce-scatter.1
  ROOT %tuple = (s32[], f32[256,1024]) tuple(%i, %g)
}

%condition (param.1: (s32[], f32[256,1024])) -> pred[] {
  %constant.65 = s32[]{:T(128)} constant(4)
  %param.1 = (s32[], f32[256,1024]) parameter(0)
  %i.1 = s32[] get-tuple-element(%param.1), index=0
  ROOT %lt.10 = pred[]{:T(512)} compare(%i.1, %constant.65), direction=LT
}

ENTRY %main (a: f32[], b: f32[256,1024]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[256,1024]{1,0} parameter(1)
  %zero = s32[] constant(0)
  %init = (s32[], f32[256,1024]) tuple(%zero, %b)
  %while.34 = (s32[], f32[256,1024]) while(%init), condition=%condition, body=%body
  %all-reduce.1 = (f32[], bf16[8]{0}) all-reduce(%a, %a), channel_id=1, to_apply=%add
  %cp = (f32[32,32]{1,0}, f32[32,32]{1,0}, u32[], u32[]) collective-permute-start(%b), channel_id=2, source_target_pairs={{0,1},{1,0}}
  %cpd = f32[32,32]{1,0} collective-permute-done(%cp)
  ROOT %r = f32[] add(%a, %a)
}
"""


def test_loop_collectives_count_once_per_iteration_and_async_pieces_once():
  counts, known = hlo_collectives.collectives(HLO)
  assert known
  assert counts == {
      # one all-gather per iteration (channel 8 appears twice), the gathered bf16 weight
      'all-gather': {'count': 4, 'bytes': 4 * 256 * 1024 * 2},
      # the all-reduce-scatter fusion is a reduce-scatter of the f32 shard, not an all-reduce
      'reduce-scatter': {'count': 4, 'bytes': 4 * 64 * 1024 * 4},
      'all-reduce': {'count': 1, 'bytes': 4 + 8 * 2},
      # the async start's tuple holds (operand, output, contexts): the output is counted
      'collective-permute': {'count': 1, 'bytes': 32 * 32 * 4},
  }


def test_instances_name_the_op_and_rank_by_bytes():
  records, _ = hlo_collectives.instances(HLO)
  gather = next(r for r in records if r['op'] == 'all-gather')
  assert gather['type'] == 'bf16[1,256,1024]' and gather['name'].endswith('dot_general')
  assert hlo_collectives.largest(records, 1) == ['all-gather bf16[1,256,1024] ×4 (2.0 MB)']


def test_a_loop_of_unknown_trip_count_counts_once_and_says_so():
  hlo = HLO.replace('direction=LT', 'direction=NE')
  counts, known = hlo_collectives.collectives(hlo)
  assert not known and counts['all-gather']['count'] == 1


def test_array_bytes_of_tuples_and_scalars():
  assert hlo_collectives.array_bytes('(f32[], bf16[2,3]{1,0}, pred[4])') == 4 + 12 + 4
  assert hlo_collectives.collectives('no module here') == ({}, False)
