"""The SnapGen training recipe: one training loop, stages that differ by models and losses.

Layout:
    config.py        pydantic configs (YAML in, unknown keys rejected); `load_config`
    data.py          image folders with .txt captions, WebDataset shards, ShapesBench
    shapesbench/     the synthetic compositional benchmark: renderer, prompts, judge, evaluation
    losses.py        every loss, once: flow matching, output/feature KD, timestep-aware scaling,
                     adversarial (hinge), perceptual
    teacher.py       the teacher adapter (velocity + last-layer features), SD3 MMDiT or our U-Net
    discriminator.py LADD heads on a frozen teacher's features
    loop.py          the one training loop (single process or DDP), checkpoints, resume, EMA, logs
    stages/          autoencoder, decoder, pretrain, teacher, kd, ladd: see stages/base.py
    cli.py           `snapgen train STAGE ...`, `snapgen shapes render`, `snapgen eval shapes`

`training` imports `snapgen`, never `server`.
"""
