"""Model arguments: a local folder that must exist and hold readable weights, or a Hub id.

Without this check a mistyped folder reaches ``from_pretrained`` as a would-be Hub id ("Repo id must be in the
form ...") and a truncated weights file fails with safetensors' "incomplete metadata" and no file name.
"""

from pathlib import Path


def check_model_path(name_or_path: str) -> str:
    """``name_or_path`` unchanged when it is an existing path (the header of every ``*.safetensors`` of a folder is
    opened, no tensor read) or a Hub id that may load (huggingface_hub's ``validate_repo_id``); otherwise
    FileNotFoundError "model folder not found: NAME (...)", also for a Hub id that offline mode cannot reach. A
    string meant as a local path (``./x``, ``../x``, ``/x``, ``~/x``, more than one ``/``, or a first part that is an
    existing folder: ``runs/tiny`` beside a ``runs/``) is never taken for a Hub id."""
    from huggingface_hub import constants, try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id
    from safetensors import SafetensorError, safe_open

    path = Path(name_or_path).expanduser()
    if path.exists():
        if path.is_dir():  # a training output dir holds its model in final_model/
            inner = path / "final_model"
            folder = inner if not (path / "config.json").is_file() and inner.is_dir() else path
            for file in sorted(folder.glob("*.safetensors")):
                try:
                    with safe_open(str(file), framework="pt"):
                        pass
                except (SafetensorError, OSError) as err:
                    raise ValueError(f"{file}: damaged or truncated weights file ({err}); export or download the "
                                     "model again") from None
        return name_or_path
    not_found = f"model folder not found: {name_or_path} (no such file or directory"
    if name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1 or (
            "/" in name_or_path and Path(name_or_path.split("/", 1)[0]).is_dir()):
        raise FileNotFoundError(not_found + ")")
    try:
        validate_repo_id(name_or_path)
    except HFValidationError:
        raise FileNotFoundError(not_found + ", and not a Hub id of the form OWNER/NAME)") from None
    if constants.is_offline_mode() and not isinstance(try_to_load_from_cache(name_or_path, "config.json"), str):
        raise FileNotFoundError(not_found + "; as a Hub id it is not in the local Hugging Face cache, and offline "
                                "mode (HF_HUB_OFFLINE=1) cannot download it)")
    return name_or_path
