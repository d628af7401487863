"""Released quantized checkpoints (GPTQ, AWQ, bitsandbytes, compressed-tensors, quantlens' own
export) read as settings of their base model, and written back: the floor above the quantizers
(docs/ARCHITECTURE.md), so the model floor never imports a packing format."""
