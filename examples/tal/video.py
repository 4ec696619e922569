"""Reading frames: folders of JPEG frames (Pillow) or video files (PyAV).

JPEG folders are read with Pillow, which torchvision already depends on; torchvision's own
image codecs are deprecated since 0.29 (in favour of TorchCodec) and importing them pulls in
much of torch's compiler stack. torchvision 0.29 no longer reads video at all
(``torchvision.io.read_video`` is gone), so video files are decoded with PyAV
(``pip install av``): FFmpeg's libraries behind a maintained Python API, with binary wheels
that bundle FFmpeg (TorchCodec needs a system FFmpeg). PyAV is imported only when a video
file is opened, so JPEG folders work without it.

Every source returns frames as uint8 tensors (T, 3, H, W), indexed by frame number.
"""
from __future__ import annotations

import functools
import os
import tempfile
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

IMAGE_EXTS = (".jpg", ".jpeg")
VIDEO_EXTS = (".mp4", ".mkv", ".webm", ".avi", ".mov")


class JpegFolder:
    """A folder of frames, one JPEG per frame, in file-name order (``img_00000.jpg``, ...)."""

    def __init__(self, folder: os.PathLike, fps: Optional[float] = None):
        self.path = Path(folder)
        self.files = _list_frames(str(self.path))
        if not self.files:
            raise FileNotFoundError(f"frame folder {str(self.path)!r} has no .jpg files")
        self.fps = fps

    @property
    def num_frames(self) -> int:
        return len(self.files)

    def read(self, indices: Sequence[int]) -> torch.Tensor:
        """Frames at `indices` (clamped to the video) as uint8 (T, 3, H, W)."""
        from PIL import Image

        last = len(self.files) - 1
        cache = {}
        out = []
        for i in indices:
            i = min(max(int(i), 0), last)
            if i not in cache:
                with Image.open(os.path.join(self.path, self.files[i])) as im:
                    cache[i] = np.asarray(im.convert("RGB"))
            out.append(cache[i])
        return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).contiguous()


@functools.lru_cache(maxsize=4096)
def _list_frames(folder: str) -> tuple:
    """Sorted JPEG file names of a folder (cached: a dataset opens each folder every epoch)."""
    return tuple(sorted(f for f in os.listdir(folder) if f.lower().endswith(IMAGE_EXTS)))


class VideoFile:
    """A video file decoded with PyAV; frame i is the one shown at time i / fps."""

    def __init__(self, path: os.PathLike, fps: Optional[float] = None):
        av = _import_av()
        self.path = Path(path)
        with av.open(str(self.path)) as container:
            if not container.streams.video:
                raise ValueError(f"{str(self.path)!r} has no video stream")
            stream = container.streams.video[0]
            rate = float(stream.average_rate) if stream.average_rate else None
            self.fps = fps or rate
            if not self.fps:
                raise ValueError(f"{str(self.path)!r}: unknown frame rate; give 'fps' in the annotations")
            n = stream.frames
            if not n:
                duration = float(stream.duration * stream.time_base) if stream.duration else \
                    container.duration / 1e6
                n = int(round(duration * self.fps))
        self._num_frames = int(n)

    @property
    def num_frames(self) -> int:
        return self._num_frames

    def read(self, indices: Sequence[int]) -> torch.Tensor:
        """Frames at `indices` (clamped to the video) as uint8 (T, 3, H, W).

        Seeks to the keyframe before the first wanted frame and decodes forward once.
        """
        av = _import_av()
        wanted = sorted({min(max(int(i), 0), self._num_frames - 1) for i in indices})
        wanted_set = set(wanted)
        got = {}
        with av.open(str(self.path)) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            start = (stream.start_time or 0) * stream.time_base
            first_time = wanted[0] / self.fps
            container.seek(int((first_time + float(start)) / stream.time_base), stream=stream, backward=True)
            last_frame = None
            for frame in container.decode(stream):
                index = int(round((float(frame.pts * frame.time_base) - float(start)) * self.fps))
                last_frame = frame
                if index in wanted_set and index not in got:
                    got[index] = frame.to_ndarray(format="rgb24")
                if index >= wanted[-1]:
                    break
        if not got:
            if last_frame is None:
                raise ValueError(f"{str(self.path)!r}: could not decode any frame")
            got[wanted[0]] = last_frame.to_ndarray(format="rgb24")
        # a frame the stream does not have (metadata longer than the stream) repeats the one before
        filled, prev = {}, got[min(got)]
        for i in wanted:
            prev = got.get(i, prev)
            filled[i] = prev
        out = [filled[min(max(int(i), 0), self._num_frames - 1)] for i in indices]
        return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).contiguous()


def open_video(media_root: os.PathLike, video_id: str, fps: Optional[float] = None):
    """`media_root/video_id/` (JPEG frames) or `media_root/video_id.<ext>` (a video file)."""
    root = Path(media_root)
    folder = root / video_id
    if folder.is_dir():
        return JpegFolder(folder, fps)
    for ext in VIDEO_EXTS:
        path = root / f"{video_id}{ext}"
        if path.is_file():
            return VideoFile(path, fps)
    raise FileNotFoundError(
        f"no frames for video {video_id!r}: expected a folder {str(folder)!r} of JPEG frames or a file "
        f"{str(root / video_id)}{{{','.join(VIDEO_EXTS)}}}"
    )


def write_video(path: os.PathLike, frames: np.ndarray, fps: float, codec: str = "libx264") -> None:
    """Write uint8 (T, H, W, 3) frames to a video file (atomically: temp file, then os.replace)."""
    av = _import_av()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=path.suffix)
    os.close(fd)
    try:
        from fractions import Fraction

        with av.open(tmp, mode="w") as container:
            stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1001))
            stream.height, stream.width = frames.shape[1], frames.shape[2]
            stream.pix_fmt = "yuv444p" if codec == "libx264" else "yuv420p"
            if codec == "libx264":
                stream.options = {"crf": "12", "preset": "veryfast", "threads": "1"}
            for frame in frames:
                for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
        from data import default_file_mode

        os.chmod(tmp, default_file_mode())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _import_av():
    try:
        import av
    except ImportError:
        raise ImportError(
            "reading or writing video files needs PyAV: pip install av "
            "(or extract JPEG frames into <media_root>/<video_id>/ folders)"
        ) from None
    return av
