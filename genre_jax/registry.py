"""Name -> part registries, so configs select parts by string."""

from __future__ import annotations

from typing import Callable, TypeVar

from genre_jax.errors import ConfigError

T = TypeVar("T")


class Registry:
  """A mapping from config names to constructors of one kind of part."""

  def __init__(self, kind: str):
    self.kind = kind
    self._parts: dict[str, Callable] = {}

  def register(self, name: str) -> Callable[[T], T]:
    def decorator(part: T) -> T:
      if name in self._parts:
        raise ValueError(f"{self.kind} '{name}' registered twice")
      self._parts[name] = part
      return part
    return decorator

  def get(self, name: str) -> Callable:
    if name not in self._parts:
      raise ConfigError(
          f"unknown {self.kind} '{name}'; choose one of {sorted(self._parts)}")
    return self._parts[name]

  def names(self) -> list[str]:
    return sorted(self._parts)

  def __contains__(self, name: str) -> bool:
    return name in self._parts


ITEM_ENCODERS = Registry("item encoder")
USER_ENCODERS = Registry("user encoder")
PREDICTORS = Registry("click predictor")
DATASETS = Registry("dataset")
