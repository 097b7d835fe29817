"""A trained fmnist_common network as the daemon runs it: ONNX export, the model.toml
that Models.Publish takes, and training images as the PNG inputs the daemon decodes.

Shared by clients/python/examples/train_neighbour_batches.py and experiment.py's
likeness-batches-activate: both publish each version of the network they train and
activate it on the training collection, so that the daemon re-embeds the stored
images instead of the trainer.
"""

import io
import os
import warnings

import fmnist_common as fc

MANIFEST = """name = "{name}"
version = "{version}"
[[towers]]
name = "image"
file = "model.onnx"
input = "input"
output = "embedding"
dimension = {dim}
normalize = true          # the graph already L2-normalises
metric = "cosine"
[towers.image]
channels = 1
height = 28
width = 28
resize = "bilinear"
mean = [{mean}]
std = [{std}]
"""


def png(a):
    """uint8 [28,28] -> PNG bytes: the input the daemon's image tower decodes."""
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(a, "L").save(buf, format="PNG")
    return buf.getvalue()


def export(model, out_dir, name, version, mean, std):
    """The model as out_dir/v{version}/model.onnx plus the model.toml that Publish takes
    (the daemon scales pixels to [0, 1], then applies mean and std: the trainer's own
    preprocessing, so the daemon's vectors are the trainer's). Returns the manifest's
    path. The model is exported in eval mode (BatchNorm's running statistics, as at
    inference) and left in train mode."""
    import torch
    folder = os.path.join(out_dir, f"v{version}")
    os.makedirs(folder, exist_ok=True)
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(model, torch.zeros(2, 1, 28, 28), os.path.join(folder, "model.onnx"),
                          dynamo=False, opset_version=17, input_names=["input"],
                          output_names=["embedding"],
                          dynamic_axes={"input": {0: "batch"}, "embedding": {0: "batch"}})
    model.train()
    manifest = os.path.join(folder, "model.toml")
    with open(manifest, "w") as f:
        f.write(MANIFEST.format(name=name, version=version, dim=fc.EMBED_DIM, mean=mean, std=std))
    return manifest
