"""A stand-in for Triton's onnxruntime backend, for the ``tritonserver`` of the nvidia-pytriton wheel.

That wheel ships the python backend only. Triton also runs *Python-based backends*: a ``model.py`` at
``<backend-directory>/<name>/model.py`` serves every model whose config says ``backend: "<name>"``.
``triton_export.server`` installs this file as ``onnxruntime/model.py`` when a repository needs that
backend, so an ONNX repository from ``snapgen export triton --backend onnx`` is served unchanged (the same
``config.pbtxt`` and ``model.onnx`` that NVIDIA's container runs with its C++ onnxruntime backend) by the
onnxruntime Python package. It is for running and testing without the container, not for production.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        import onnxruntime as ort

        config = json.loads(args["model_config"])
        filename = config.get("default_model_filename") or "model.onnx"
        options = ort.SessionOptions()
        options.log_severity_level = 3
        if os.environ.get("SNAPGEN_TORCH_THREADS"):
            options.intra_op_num_threads = int(os.environ["SNAPGEN_TORCH_THREADS"])
        path = Path(args["model_repository"]) / args["model_version"] / filename
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.inputs = [spec["name"] for spec in config["input"]]
        self.outputs = [spec["name"] for spec in config["output"]]

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                feeds = {name: pb_utils.get_input_tensor_by_name(request, name).as_numpy() for name in self.inputs}
                out = self.session.run(self.outputs, feeds)
                tensors = [pb_utils.Tensor(name, value) for name, value in zip(self.outputs, out)]
                responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
            except Exception as e:
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(f"{type(e).__name__}: {e}")))
        return responses
