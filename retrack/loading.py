"""One model load at a time in a process.

While they build a model, diffusers (through accelerate's `init_empty_weights`) and transformers
patch torch for the whole process, not the calling thread: `nn.Module.register_parameter`,
`torch.nn.init`, `torch.linspace`, the default dtype. Two loads in two threads (the app opening a
model while a job or the CLIP scorer loads another) then leave each other's parameters on the meta
device ("Cannot copy out of meta tensor"). Every place in retrack that builds or loads a network
holds this lock; it is re-entrant because a LoRA folder loads its base model inside its own load.
"""

import threading

MODEL_LOADING = threading.RLock()

__all__ = ["MODEL_LOADING"]
