"""resnet_dist: a distributed trainer of the classic ResNet-18 on Fashion-MNIST (README.md: the commands)."""

__version__ = "0.1.0"
