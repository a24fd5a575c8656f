"""contrastive: self-supervised image representations from folders of unlabeled images, on JAX.

Importing the package changes nothing in the process and imports no JAX; the functions below are
loaded when first used:

    pretrain(folder, cfg, output)          train an encoder -> run directory   (train/loop.py)
    embed_folder(folder, run, out.npy)     embeddings + index                  (infer/embed.py)
    similarity(a, b, run)                  cosine of two images                (infer/embed.py)
    similarity_pairs([(a, b), ...], run)   cosines of many pairs, one model load (infer/embed.py)
    load_encoder(run)                      the trained encoder, model only     (infer/encoder.py)
    load_model(run_or_file)                a run, or an .onnx/.stablehlo/.safetensors encoder (infer/portable.py)
    embed_files(encoder, [paths])          embeddings of image files           (infer/portable.py)
    export(run, "onnx", "encoder.onnx")    write the encoder for use elsewhere (infer/export.py)
"""

__version__ = "0.4.0"

_LAZY = {"pretrain": "train.loop", "embed_folder": "infer.embed", "similarity": "infer.embed",
         "similarity_pairs": "infer.embed",
         "load_encoder": "infer.encoder", "load_model": "infer.portable", "embed_files": "infer.portable",
         "export": "infer.export", "TrainConfig": "config", "ModelConfig": "config",
         "AugmentConfig": "config", "ContrastiveError": "errors"}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
