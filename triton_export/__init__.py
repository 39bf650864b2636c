"""NVIDIA Triton Inference Server model repositories of the server's model (docs/triton.md).

``snapgen export triton`` writes three models (text encoder, U-Net, decoder), served by the python
backend (the project's PyTorch modules) or the onnxruntime backend; the worker's
``server.triton_backend.TritonBackend`` keeps the sampler loop and calls them. ``triton_export.server``
runs the ``tritonserver`` binary of the nvidia-pytriton wheel without Docker.
"""
