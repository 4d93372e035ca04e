"""The VideoLLaMA3 network as plain `torch.nn` modules (no file reading, no printing).

`VideoLlama3` = `VisionEncoder` (vision.py) + `Projector` (projector.py) + `Qwen2Model`
(language.py) + `lm_head`; parameter names follow the checkpoints' own key names.
"""

from .language import KVCache, Qwen2Model
from .projector import Projector
from .vision import VisionEncoder
from .vl3 import VideoLlama3

__all__ = ["KVCache", "Projector", "Qwen2Model", "VideoLlama3", "VisionEncoder"]
