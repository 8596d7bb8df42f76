"""Text-to-image at 256×256 in latent space: the PixArt-α recipe in our conventions, for
accelerators.

Not run in CI (tests/imagenet_pipeline_test.py runs the same path on a tiny stand-in: random
SD-VAE and CLIP weights in their real file formats, a caption folder the test writes). The path:
  image–caption data (an imagefolder with metadata.jsonl, `input.dataset='caption_folder'`, or
  WebDataset tar shards, `'webdataset'`; docs/text.md) → ADM center crop to 256 → the Stable
  Diffusion VAE (`sd-vae-ft-ema`: --config.autoencoder.weights=PATH) encodes every image and its
  mirror once into the latent cache, each row keeping its caption id → the frozen text encoder
  (T5 v1.1 XXL, PixArt-α's, 120 tokens: --config.text.weights=FOLDER of the transformers
  checkpoint; or CLIP ViT-L/14, 77 tokens: --config.text.encoder=clip) encodes every caption
  once into the text cache → the cross-attention DiT (`models/dit_text.py`: the PixArt-α block,
  adaLN-single, pooled text added to the time embedding) on z = (mean + std·ε) · 0.18215 with
  caption dropout 0.1 to a learned null condition → sampling with CFG (or a negative prompt in
  ∅'s place) → SD-VAE decode.
Steps: `--mode=encode` (writes the latent cache and the text cache), then train,
`--mode=sample --config.sampling.prompts='a red fox in the snow;...'`.

The text cache stores every caption's hidden states: T5-XXL's 120 × 4,096 in bfloat16 are 0.98 MB
a caption (PixArt-α stores the same features), so a million captions take about 1 TB: give
--config.text.cache_dir a disk that holds it, or use CLIP-L (77 × 768: 0.12 MB a caption).

Recipe (PixArt-α's 256² stage, in our conventions): DiT-XL/2 with cross-attention (616.9M
parameters with T5-XXL features), linear path, velocity prediction, uniform t, caption dropout
0.1, AdamW lr 2e-5 constant with weight decay 0.03, the global gradient norm clipped at 1,
batch 256, EMA 0.9999, bf16 compute with f32 parameters. Sample with Heun at 50 steps, w = 4.5 (PixArt-α's CFG scale).

Mesh and topology as configs/imagenet256_latent.py ('VARIANT,TOPOLOGY', e.g. 'XL/2,v5p-64': mesh
(4, 8, 1)). `--mode=compile` needs no weights: `--config.text.weights=t5-v1_1-xxl` (or
`openai-vit-l-14` with text.encoder=clip) names the encoder's width. docs/text.md gives XLA:TPU's
memory table for v5p-64, with and without the T5-XXL encoder sharded on the same pod.

Usage:
  python -m guidedflow.main --config configs/t2i_latent.py --workdir gs://BUCKET/t2i --mode=encode
  python -m guidedflow.main --config configs/t2i_latent.py --workdir gs://BUCKET/t2i
  python -m guidedflow.main --config configs/t2i_latent.py:XL/2,v5p-64 --workdir /tmp/aot \\
      --mode=compile --config.compile.topology=v5p-64 --config.text.weights=t5-v1_1-xxl
"""

from configs import imagenet256_latent


def get_config(arg='XL/2'):
  """arg: 'VARIANT' or 'VARIANT,TOPOLOGY', e.g. 'XL/2', 'XL/2,v5p-64'."""
  config = imagenet256_latent.get_config(arg)
  config.input.dataset = 'caption_folder'  # or 'webdataset' (data_dir: shards' folder or glob)
  config.input.data_dir = '/data/captions'
  config.input.caption_column = 'text'
  config.input.num_classes = 0
  config.autoencoder.cache_dir = '/data/latent_cache/t2i256_sd-vae-ft-ema'

  config.text.encoder = 't5'
  config.text.weights = '/data/t5-v1_1-xxl'
  config.text.max_length = None          # the encoder's: 120 tokens for T5 (PixArt-α's), 77 for CLIP
  config.text.cache_dir = '/data/text_cache/t2i_t5-v1_1-xxl'
  config.text.cache_dtype = 'bfloat16'
  config.text.batch_size = 64
  config.text.null = 'learned'
  config.loss.label_dropout = 0.1        # caption dropout

  config.optim.learning_rate = 2e-5
  config.optim.weight_decay = 0.03
  config.optim.grad_clip_norm = 1.0

  config.sampling.num_steps = 50
  config.sampling.guidance_scale = 4.5
  config.sampling.num_samples = 16
  config.sampling.batch_size = 16
  config.sampling.npz_keys = 'guidedflow'
  config.sampling.grid_classes = None
  config.sampling.grid_guidance_scales = (1.0, 4.5)
  config.sampling.grid_samples_per_class = 4
  config.eval.feature_network = 'none'   # held-out loss; sample metrics of text: Fashion-MNIST
  config.eval.guidance_scales = None
  config.eval.samples_per_class = 1
  return config
