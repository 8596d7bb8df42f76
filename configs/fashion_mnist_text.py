"""Fashion-MNIST with captions as y, the CPU default with text (issue 48).

Usage:
  python -m guidedflow.main --config configs/fashion_mnist_text.py --workdir runs/fmnist_text
  python -m guidedflow.main --config configs/fashion_mnist_text.py --workdir runs/fmnist_text \\
      --mode=sample --config.sampling.prompts='a dark wide pullover;a small light sandal'

The class-conditional default (configs/fashion_mnist.py: its U-Net, optimizer, sampler and time
budget) with the labels replaced by captions (guidedflow/captions.py: the class, a synonym and
up to two attributes measured from the image, drawn per example and epoch; the held-out
compositions — dark sneakers, patterned pullovers, narrow bags — left out of training). The
captions are encoded by a small byte-level transformer trained with the generator (no weights
to download); the text U-Net takes its pooled vector in the label adapters and its tokens by
cross-attention at 14×14 and 7×7; 10 % of the captions are dropped for the learned null
condition of CFG.
"""

from configs import fashion_mnist


def get_config():
  config = fashion_mnist.get_config('unet', sampler='cfg')
  config.text.encoder = 'trained'
  config.text.encoder_width = 128
  config.text.encoder_depth = 3
  config.text.encoder_heads = 4
  # Bytes, 64 per caption (every caption is at most 60 bytes), as the figures of docs/text.md
  # were measured. Words (the caption vocabulary, 12 words at most): --config.text.tokenizer_kind=
  # words --config.text.max_length=16.
  config.text.tokenizer_kind = 'bytes'
  config.text.max_length = 64
  config.text.null = 'learned'
  config.loss.label_dropout = 0.1  # caption dropout
  config.model.unet_text_attention_levels = (-2, -1)  # 14×14 and 7×7
  config.model.unet_text_heads = 4
  # --mode=evaluate: the class default's three judges on the captions of 5,000 test images,
  # and attribute accuracy on 20 samples of each class × attribute × level prompt
  # (guidedflow/text_evaluate.py), along eval.guidance_scales.
  config.eval.samples_per_composition = 20
  return config
