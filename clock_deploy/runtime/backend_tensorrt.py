"""TensorRT backend (no torch): a serialized engine run with cuda-python buffers.

Written against the TensorRT 10 name-based I/O API (num_io_tensors, set_input_shape,
set_tensor_address, execute_async_v3), which TensorRT 11 keeps. Device buffers are
allocated once for the largest batch the engine accepts and reused for every call.
"""
import os

import numpy as np

from clock_deploy.artifact import INPUT_NAME, OUTPUT_NAMES
from clock_deploy.errors import UserError
from clock_deploy.nvidia import TensorRTUnavailable, import_cudart, import_tensorrt


def _check(cudart, result):
    """cuda-python calls return (error, *values): raise on error, return the values."""
    err, *values = result
    if err != cudart.cudaError_t.cudaSuccess:
        raise RuntimeError(f"CUDA error {err}")
    return values[0] if len(values) == 1 else values


class TensorRTBackend:
    name = "tensorrt"

    def __init__(self, path, meta, device="cuda"):
        build = meta.get("tensorrt") or {}
        trt = import_tensorrt(build.get("builder", "tensorrt"))  # a TensorRT-RTX engine runs on TensorRT-RTX
        path = os.fspath(path)
        built_with = build.get("version")
        if built_with != trt.__version__:
            raise UserError(f"{path}: engine built with TensorRT {built_with}, this is TensorRT {trt.__version__}; "
                            "engines only run on the version (and GPU) that built them: rebuild it with "
                            "`clock-deploy export --trt` on this device")
        self.cudart = cudart = import_cudart()
        index = int(device.split(":")[1]) if ":" in device else 0
        count = cudart.cudaGetDeviceCount()
        if count[0] != cudart.cudaError_t.cudaSuccess or count[1] <= index:
            raise TensorRTUnavailable(f"no NVIDIA GPU {index} visible to CUDA; TensorRT engines need one")
        _check(cudart, cudart.cudaSetDevice(index))
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        with open(path, "rb") as f:
            self.engine = self.runtime.deserialize_cuda_engine(f.read())
        if self.engine is None:
            raise UserError(f"{path}: TensorRT {trt.__version__} cannot deserialize it (corrupt file, or built "
                            "for another TensorRT version / GPU)")
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        if sorted(names) != sorted((INPUT_NAME, *OUTPUT_NAMES)):
            raise UserError(f"{path}: engine tensors are {names}, expected {[INPUT_NAME, *OUTPUT_NAMES]}")
        self.context = self.engine.create_execution_context()
        self.stream = _check(cudart, cudart.cudaStreamCreate())
        shape = tuple(self.engine.get_tensor_shape(INPUT_NAME))
        self.static = shape[0] != -1
        largest = shape[0] if self.static else self.engine.get_tensor_profile_shape(INPUT_NAME, 0)[2][0]
        self.max_batch = largest
        self.dtypes = {n: np.dtype(trt.nptype(self.engine.get_tensor_dtype(n))) for n in names}
        self.buffers = {}
        self.context.set_input_shape(INPUT_NAME, (largest, *shape[1:]))
        for name in names:
            size = int(np.prod(tuple(self.context.get_tensor_shape(name)))) * self.dtypes[name].itemsize
            self.buffers[name] = _check(cudart, cudart.cudaMalloc(size))
            self.context.set_tensor_address(name, self.buffers[name])

    def __call__(self, images):
        cudart = self.cudart
        images = np.ascontiguousarray(images, dtype=self.dtypes[INPUT_NAME])
        self.context.set_input_shape(INPUT_NAME, images.shape)
        kind = cudart.cudaMemcpyKind
        _check(cudart, cudart.cudaMemcpyAsync(self.buffers[INPUT_NAME], images.ctypes.data, images.nbytes,
                                              kind.cudaMemcpyHostToDevice, self.stream))
        if not self.context.execute_async_v3(self.stream):
            raise RuntimeError("TensorRT execution failed")
        outputs = []
        for name in OUTPUT_NAMES:
            host = np.empty(tuple(self.context.get_tensor_shape(name)), dtype=self.dtypes[name])
            _check(cudart, cudart.cudaMemcpyAsync(host.ctypes.data, self.buffers[name], host.nbytes,
                                                  kind.cudaMemcpyDeviceToHost, self.stream))
            outputs.append(host)
        _check(cudart, cudart.cudaStreamSynchronize(self.stream))
        return tuple(outputs)

    def __del__(self):
        cudart = getattr(self, "cudart", None)
        for ptr in getattr(self, "buffers", {}).values():
            cudart.cudaFree(ptr)
        if getattr(self, "stream", None) is not None:
            cudart.cudaStreamDestroy(self.stream)
