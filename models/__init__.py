"""Built-in reference PyTorch models (llama-tiny, unet-tiny, yolo-tiny) and their registry."""
