"""Exceptions raised by the toolkit. Each message names what is wrong and how to fix it."""


class UmlipLatentsError(Exception):
    """Base class of every error this package raises on purpose."""


class ModelUnavailable(UmlipLatentsError):
    """A registered model cannot be loaded here (missing checkpoint, package or environment)."""


class UnsupportedElement(UmlipLatentsError):
    """A structure holds an element the model was not trained on."""


class StructureError(UmlipLatentsError):
    """A structure is malformed: empty, NaN positions, atoms on top of each other, a duplicate id, unreadable file."""


class DatasetError(UmlipLatentsError):
    """A dataset cannot be found, fetched or verified."""


class ChecksumMismatch(DatasetError):
    """A downloaded or cached file does not have the registered sha256."""


class RegistryError(UmlipLatentsError):
    """A model registry file does not follow the schema."""


class ExtractionFailed(UmlipLatentsError):
    """An extraction run in another environment failed; carries the child's message."""


class NonFiniteFeatures(ExtractionFailed):
    """A model returned NaN or infinite features or energies; they are never stored."""


class DeviceError(UmlipLatentsError):
    """The requested device is not a device name, or is not present on this machine."""


class StoreError(UmlipLatentsError):
    """The feature store cannot be written (read-only, not a folder) or an entry cannot be served."""


class EntryDamaged(StoreError):
    """A stored entry fails its integrity check (missing, truncated or altered file)."""


class StoreWarning(UserWarning):
    """A damaged store entry or shard was found and is being recomputed."""


# Names the child worker may send back; the parent re-raises the same class.
ERROR_CLASSES = {
    cls.__name__: cls
    for cls in (
        UmlipLatentsError,
        ModelUnavailable,
        ExtractionFailed,
        NonFiniteFeatures,
        DeviceError,
        StoreError,
        EntryDamaged,
        UnsupportedElement,
        StructureError,
        DatasetError,
        ChecksumMismatch,
        RegistryError,
    )
}
