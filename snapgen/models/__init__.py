"""SnapGen models: U-Net, tiny decoder and small autoencoder."""
