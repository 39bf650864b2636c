"""Triton python-backend model of one snapgen component: copied as ``REPO/<model>/1/model.py`` by
``snapgen export triton --backend python``.

It runs the project's PyTorch modules (``triton_export.graphs``), so the interpreter of Triton's
python-backend stub must import ``snapgen``, ``mobile_export`` and ``triton_export`` (with torch, diffusers,
transformers): with the nvidia-pytriton binary that is this virtual environment (``triton_export.server``
sets it up); in NVIDIA's container, install the project into the image's Python, or point the model at a
packed environment with ``EXECUTION_ENV_PATH`` (docs/triton.md). The weights are read from the component
directory beside this file (``1/unet/``, ...), copied there by the exporter.

``SNAPGEN_TORCH_THREADS`` in Triton's environment sets torch's CPU threads.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        import torch

        from triton_export.graphs import load_component

        config = json.loads(args["model_config"])
        parameters = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
        component = parameters["snapgen_component"]
        gpu = args["model_instance_kind"] == "GPU"
        self.device = torch.device(f"cuda:{args['model_instance_device_id']}" if gpu else "cpu")
        if os.environ.get("SNAPGEN_TORCH_THREADS"):
            torch.set_num_threads(int(os.environ["SNAPGEN_TORCH_THREADS"]))
        self.inputs = [spec["name"] for spec in config["input"]]
        self.outputs = [spec["name"] for spec in config["output"]]
        weights = Path(args["model_repository"]) / args["model_version"] / component
        self.module = load_component(component, weights, self.device, with_pooled="pooled" in self.outputs
                                     or "pooled_projections" in self.inputs)  # fmt: skip
        if component == "unet":  # the same numbers with less Python per call, as in the server (snapgen.tracing)
            from snapgen.tracing import ShapeTraces

            self.module = ShapeTraces(self.module)

    def execute(self, requests):
        import torch

        arrays = [[pb_utils.get_input_tensor_by_name(r, name).as_numpy() for name in self.inputs] for r in requests]
        # The dynamic batcher may hand over several requests at once: those of one shape run as one batch.
        groups: dict[tuple, list[int]] = {}
        for i, item in enumerate(arrays):
            groups.setdefault(tuple(a.shape[1:] for a in item), []).append(i)
        responses = [None] * len(requests)
        for members in groups.values():
            try:
                with torch.inference_mode():
                    args = [
                        torch.from_numpy(np.concatenate([arrays[i][k] for i in members])).to(self.device)
                        for k in range(len(self.inputs))
                    ]
                    out = self.module(*args)
                    out = [o.float().cpu().numpy() for o in (out if isinstance(out, tuple) else (out,))]
                start = 0
                for i in members:
                    n = arrays[i][0].shape[0]
                    tensors = [pb_utils.Tensor(name, np.ascontiguousarray(o[start : start + n]))
                               for name, o in zip(self.outputs, out)]  # fmt: skip
                    responses[i] = pb_utils.InferenceResponse(output_tensors=tensors)
                    start += n
            except Exception as e:  # answer every request: an exception here would fail the whole model
                error = pb_utils.TritonError(f"{type(e).__name__}: {e}")
                for i in members:
                    responses[i] = pb_utils.InferenceResponse(error=error)
        return responses
