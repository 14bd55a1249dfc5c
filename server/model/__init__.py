"""Loading the one base model: from a directory, the hub's cache or a GGUF file, quantized or with its Linear
layers packed for the CPU, into the BaseModel the engine serves."""
