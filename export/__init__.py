"""hiddenstate's offline side: models, data, training, ONNX step export and parity."""
