"""One error hierarchy. Every message says what failed, the value seen, what was expected and the fix."""


def first_line(exc: BaseException, default: str | None = None) -> str:
    """The first line of ``exc``'s message, for one-line reports of a library's multi-line errors.

    Args:
        exc: the exception.
        default: returned for an empty message; None returns the exception's type name.
    """
    text = str(exc).strip()
    if text:
        return text.splitlines()[0]
    return type(exc).__name__ if default is None else default


class FluxtrtError(Exception):
    """Base class of every error fluxtrt raises on purpose; the CLI prints its message as one line."""


class InputError(FluxtrtError):
    """A user-supplied value (image, size, steps, device, prompt) is not usable."""


class ModelLoadError(FluxtrtError):
    """A checkpoint could not be found or is not a FLUX.1-Kontext checkpoint in diffusers format."""


class ShapeError(FluxtrtError):
    """A tensor fed to a runner does not match the component spec (name, dtype or shape) or the built range."""


class DeviceMismatchError(FluxtrtError):
    """A tensor fed to a runner lives on another device than the one the runner runs on."""


class DeviceError(FluxtrtError):
    """The requested device or precision is not available on this machine."""


class MissingDependencyError(FluxtrtError):
    """An optional package needed for a feature is not installed."""

    def __init__(self, package: str, feature: str, install: str):
        """``install`` is a command (``pip install ...``, shown as "run `...`") or an instruction in words."""
        how = f"run `{install}`" if install.startswith("pip ") else install
        super().__init__(f"{feature} needs the Python package '{package}', which is not installed: {how}")
        self.package = package
        self.feature = feature
        self.install = install

    def __reduce__(self):
        # Rebuilt from the three arguments (an exception pickles as its message by default, which this constructor
        # does not take), so the error crosses from a `build --jobs` worker process to its parent unchanged.
        return type(self), (self.package, self.feature, self.install)


class EngineError(FluxtrtError):
    """An engines directory, manifest or engine file is missing, corrupt or was built for something else."""


class BuildError(FluxtrtError):
    """Exporting or compiling a component failed."""
