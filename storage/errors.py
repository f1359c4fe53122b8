"""What the storage layer raises, importable without pymongo (the `flead` command catches it for every command)."""


class StorageError(RuntimeError):
    """MongoDB could not be reached or refused an operation; the message says where and why."""


class StorageUnavailable(StorageError):
    """MongoDB did not answer (down, restarting, network): retrying later may succeed."""
