"""Calibration profiles on disk: ``<profiles dir>/<name>.json``, one per name, validated names only."""

from __future__ import annotations

import dataclasses
import logging
import threading
from pathlib import Path

from app.engine.calibration.limits import PROFILE_NAME
from app.engine.calibration.profile import TEMP_SUFFIX, Profile, same_model, served_key
from app.engine.types import MethodOptions
from app.errors import InvalidInput, PayloadTooLarge, ProfileConflict, ProfileMismatch, ProfileNotFound

log = logging.getLogger(__name__)

MAX_PROFILES = 64


def validate_profile_name(name: str) -> str:
    if not isinstance(name, str) or not PROFILE_NAME.fullmatch(name):
        raise InvalidInput(
            "profile names are 1-64 letters, digits, '_' or '-' (optionally one '.suffix'), "
            "starting with a letter or digit"
        )
    return name


class ProfileStore:
    """Profiles for one loaded model and method; readers get cached, validated ``Profile`` objects."""

    def __init__(self, directory: str | Path, model_id: str, options: MethodOptions) -> None:
        self.directory = Path(directory)
        self.model_id = model_id
        self.options = options
        self._cache: dict[str, tuple[float, Profile]] = {}
        self._lock = threading.Lock()
        self._write_lock = threading.Lock()  # the limit check and the write are one step

    def path(self, name: str) -> Path:
        return self.directory / f"{validate_profile_name(name)}.json"

    def names(self) -> list[str]:
        if not self.directory.is_dir():
            return []
        return sorted(p.stem for p in self.directory.glob("*.json") if PROFILE_NAME.fullmatch(p.stem))

    def get(self, name: str) -> Profile:
        path = self.path(name)
        try:
            mtime = path.stat().st_mtime
        except FileNotFoundError:
            raise ProfileNotFound(f"no calibration profile {name!r} for model {self.model_id}") from None
        with self._lock:
            cached = self._cache.get(name)
            if cached and cached[0] == mtime:
                return cached[1]
        profile = Profile.load(path, self.model_id, self.options)
        if profile.name != name:  # a copied or renamed file: answers, metrics and listings use its file name
            profile = dataclasses.replace(profile, name=name)
        with self._lock:
            self._cache[name] = (mtime, profile)
        return profile

    def load_all(self) -> dict[str, Profile | ProfileMismatch]:
        """Every profile on disk, or the reason it was refused (logged), for start-up and listings."""
        out: dict[str, Profile | ProfileMismatch] = {}
        for name in self.names():
            try:
                out[name] = self.get(name)
            except ProfileMismatch as exc:
                log.warning("calibration profile refused: %s", exc)
                out[name] = exc
        return out

    def check_new(self, name: str, overwrite: bool) -> None:
        """Refuse, before any work, a name that is taken (``overwrite`` unset) or that differs from an
        existing one only by case (two such files are one file on a case-insensitive filesystem)."""
        validate_profile_name(name)
        for existing in self.names():
            if existing.casefold() == name.casefold() and existing != name:
                raise ProfileConflict(
                    f"profile name {name!r} differs from existing {existing!r} only by case"
                )
        if self.path(name).exists() and not overwrite:
            raise ProfileConflict(f"profile {name!r} exists already (set overwrite to replace it)")

    def check_room(self, name: str, reserved: int = 0) -> bool:
        """Whether saving ``name`` adds a file; PayloadTooLarge when it would pass ``MAX_PROFILES`` with
        ``reserved`` more files on their way."""
        if self.path(name).exists():
            return False
        if len(self.names()) + reserved >= MAX_PROFILES:
            raise PayloadTooLarge(f"at most {MAX_PROFILES} profiles per model")
        return True

    def save(self, profile: Profile, overwrite: bool = False) -> Path:
        path = self.path(profile.name)
        if not same_model(profile.model_id, self.model_id) or served_key(profile.options) != served_key(
            self.options
        ):
            raise ProfileMismatch("profile was fitted for another model or other method options")
        with self._write_lock:
            self.check_new(profile.name, overwrite)
            self.check_room(profile.name)
            profile.save(path)
        with self._lock:
            self._cache.pop(profile.name, None)
        return path

    def delete(self, name: str) -> None:
        path = self.path(name)
        try:
            path.unlink()
        except FileNotFoundError:
            raise ProfileNotFound(f"no calibration profile {name!r} for model {self.model_id}") from None
        with self._lock:
            self._cache.pop(name, None)

    def remove_stale_temp_files(self) -> int:
        """Temp files of writes that never finished (a process killed mid-write); at start-up only, when no
        write of this process can be under way."""
        if not self.directory.is_dir():
            return 0
        stale = list(self.directory.glob(f".*.json.*{TEMP_SUFFIX}"))
        for path in stale:
            path.unlink(missing_ok=True)
        if stale:
            log.warning("removed %d unfinished profile write(s) from %s", len(stale), self.directory)
        return len(stale)
