"""The experiment zoo's datamodules: CIFAR-10, Stanford Cars, WikiText-2 (run from the checkout)."""
