"""Packaged yacs configs: <dataset>/<method>/<pair>.yaml (CIFAR-100), <dataset>/<pair>/<method>.yaml (ImageNet)."""
