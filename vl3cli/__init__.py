"""vl3: caption and question images and videos with VideoLLaMA3, in plain PyTorch.

    import vl3cli
    model = vl3cli.load("DAMO-NLP-SG/VideoLLaMA3-2B")
    print(model.describe("clip.mp4").text)

The package imports nothing heavy at top level (`vl3 --help` must stay fast): `load`, `Model`,
`Chat`, `Item`, `Options` and `Result` are fetched from `vl3cli.api` on first use.
"""

__version__ = "0.1.0"
__all__ = ["Chat", "Item", "Model", "Options", "Result", "load"]


def __getattr__(name: str):
    if name in __all__:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'vl3cli' has no attribute {name!r}")
