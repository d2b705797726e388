"""Plain nn.Modules of the framework (no training logic): U-Net, attention, autoencoder, encoders."""
