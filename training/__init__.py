"""The SnapGen training recipe: one training loop, stages that differ by models and losses.

Layout:
    config.py        pydantic configs (YAML in, unknown keys rejected); `load_config`
    data.py          image folders with .txt captions, WebDataset shards, ShapesBench; step-addressable order
    inputs.py        latents + text/class conditioning for flow stages, with caching
    shapesbench/     the synthetic compositional benchmark: renderer, prompts, judge, evaluation
    losses.py        flow matching, perceptual, adversarial (hinge), PSNR
    distillation.py  output/feature KD and timestep-aware scaling
    teacher.py       the teacher adapter (velocity + last-layer features), SD3 MMDiT or our U-Net
    discriminator.py LADD heads on a frozen teacher's features
    loop.py          the one training loop (single process or data-parallel)
    checkpoint.py    atomic safetensors checkpoints + JSON sidecar; distributed.py, ema.py, logger.py
    stages/          autoencoder, decoder, pretrain, teacher, kd, ladd: see stages/base.py
    cli.py           `snapgen train STAGE ...` (ShapesBench's commands: shapesbench/cli.py)

`training` imports `snapgen`, never `server`.
"""
