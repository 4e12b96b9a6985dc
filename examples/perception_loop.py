"""Embedding the clock-deploy runtime in a perception loop.

Frames are read from a folder here, standing in for a camera driver; replace `frames()`
with your camera's read loop. The detector is loaded once; each frame is an HxWx3 uint8
RGB array, and detections come back in that frame's pixels. With an .onnx or .engine
model this never imports torch.

    clock-deploy data synth --out data/synth_kitti
    clock-deploy export --ckpt runs/demo/distill/last.pt          # writes .../export/last.onnx
    python examples/perception_loop.py --model runs/demo/distill/export/last.onnx \\
        --frames data/synth_kitti/training/image_2 --max-frames 20
"""
import argparse
import os
import time

from clock_deploy.runtime import Detector
from clock_deploy.runtime.preprocess import load_image

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def frames(folder, max_frames):
    """Yield (name, RGB frame) like a camera would, in file name order."""
    names = sorted(n for n in os.listdir(folder) if n.lower().endswith(IMAGE_SUFFIXES))
    for name in names[:max_frames]:
        yield name, load_image(os.path.join(folder, name))


def describe(detections, top=3):
    objects = [f"{name} {score:.2f} [{x1:.0f}, {y1:.0f}, {x2:.0f}, {y2:.0f}]"
               for name, score, (x1, y1, x2, y2) in zip(detections.names, detections.scores, detections.boxes)]
    return ", ".join(objects[:top])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help=".onnx, .engine or .pt")
    parser.add_argument("--frames", required=True, help="folder of images standing in for the camera")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--threshold", type=float, default=0.3, help="minimum score kept")
    parser.add_argument("--max-frames", type=int, default=100)
    args = parser.parse_args()

    detector = Detector.load(args.model, device=args.device, score_threshold=args.threshold)
    for name, frame in frames(args.frames, args.max_frames):
        start = time.perf_counter()
        (detections,) = detector(frame)
        elapsed_ms = (time.perf_counter() - start) * 1000
        print(f"{name}: {len(detections)} objects in {elapsed_ms:.1f} ms  {describe(detections)}")


if __name__ == "__main__":
    main()
