import json
import os
import sys
from importlib import metadata
from pathlib import Path

# Triton kernels run on CPU only through the interpreter, and it must be on before any @triton.jit is defined.
os.environ.setdefault("TRITON_INTERPRET", "1")
# With other load on the 2 cores, spinning OpenMP threads made a LoRA step 8x slower (1.88 s vs 0.23 s passive).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "lora_fast"  # the source tree; a venv inside the checkout (.venv-ci) is an install all the same


def _installed_package_first() -> None:
    """Make `import lora_fast` find the installed package, not this checkout's source tree.

    `python -m pytest` puts the working directory first on sys.path, and there `lora_fast/` has no native library:
    its tests would skip and the run would pass on a broken build. The repository root moves behind
    site-packages (so `experiments`, which is not installed, still imports).
    """
    here = [p for p in sys.path if Path(p or os.getcwd()).resolve() == ROOT]
    for p in here:
        sys.path.remove(p)
    sys.path.extend(here or [str(ROOT)])
    module = sys.modules.get("lora_fast")
    if module is not None and Path(module.__file__).resolve().parent == SOURCE:
        raise RuntimeError("lora_fast was imported from the source tree before tests/conftest.py ran")


def _editable_install() -> bool:
    try:
        direct_url = metadata.distribution("lora_fast").read_text("direct_url.json")
    except metadata.PackageNotFoundError:
        return False
    return bool(direct_url and json.loads(direct_url).get("dir_info", {}).get("editable"))


_installed_package_first()
# import-mode=importlib keeps test folders off sys.path; the shared test helpers (_adapter_cases.py) live here
sys.path.append(str(Path(__file__).resolve().parent))

import pytest  # noqa: E402
import torch  # noqa: E402

import lora_fast  # noqa: E402
from lora_fast.ops import _backend  # noqa: E402
from lora_fast.ops import _native  # noqa: E402

if Path(lora_fast.__file__).resolve().parent == SOURCE and not _editable_install():
    raise pytest.UsageError(
        f"lora_fast is not installed (it imports from {ROOT}); the tests check the installed package and its "
        "native library: run `pip install .` first"
    )

torch.set_num_threads(min(2, os.cpu_count() or 1))

# A package built with its native library, or CI, must run the native tests: they fail instead of skipping.
NATIVE_REQUIRED = _native.installed_library() is not None or bool(os.environ.get("CI"))


def require_native() -> None:
    """Skips a native-library test where the library is legitimately absent; fails it where it must be there."""
    if _backend.has_cpp():
        return
    reason = f"lora_fast's native library is unavailable: {_backend.native_reason()}"
    if NATIVE_REQUIRED:
        pytest.fail(reason + " (the package was built with it, or CI is set)")
    pytest.skip(reason)


@pytest.fixture(params=["ref", "cpp"])
def backend(request, monkeypatch):
    """Runs a test once per CPU backend of the spectral op."""
    if request.param == "cpp":
        require_native()
    monkeypatch.setenv("LORA_FAST_BACKEND", request.param)
    return request.param


@pytest.fixture
def native():
    """The native library's Python wrapper, for tests of the library itself."""
    require_native()
    return _native
