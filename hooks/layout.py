"""TokenLayout: the role of every position in a batch.

A unified model reads and writes several kinds of tokens in one stream. Analyses need to
ask "the hidden state at the query tokens" or "at the image positions being generated", so
every captured batch carries a layout: an integer tensor ``roles`` of shape ``[batch, pos]``
whose entries index :data:`ROLES`.

Layouts may be *open-ended*: during image generation the stream grows one token per step,
and every position past the prompt gets ``tail_role`` (``image_gen`` by default).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from uniprobe.hooks.names import ROLES

ROLE_ID: dict[str, int] = {name: i for i, name in enumerate(ROLES)}


def role_ids(roles: Iterable[str]) -> list[int]:
    """Map role names to ids, with an error naming the valid roles."""
    out = []
    for r in roles:
        if r not in ROLE_ID:
            raise ValueError(f"unknown role {r!r}; valid roles are {', '.join(ROLES)}")
        out.append(ROLE_ID[r])
    return out


@dataclass
class TokenLayout:
    """Roles of the positions of a batch.

    Attributes:
        roles: ``[batch, pos]`` int64, entries index :data:`ROLES`.
        tail_role: role of positions at or past ``pos`` (open-ended layouts, generation);
            ``None`` means such positions are out of range (an error).
    """

    roles: torch.Tensor
    tail_role: str | None = None

    def __post_init__(self) -> None:
        self.roles = torch.as_tensor(self.roles, dtype=torch.long)
        if self.roles.dim() != 2:
            raise ValueError(f"TokenLayout.roles must be [batch, pos], got shape {tuple(self.roles.shape)}")
        if self.roles.numel() and (self.roles.min() < 0 or self.roles.max() >= len(ROLES)):
            raise ValueError(f"TokenLayout.roles entries must be in 0..{len(ROLES) - 1}")
        if self.tail_role is not None:
            role_ids([self.tail_role])

    # -- construction -------------------------------------------------------------------
    @classmethod
    def from_names(cls, names: Sequence[Sequence[str]], tail_role: str | None = None) -> TokenLayout:
        """Build from per-example lists of role names (all the same length)."""
        lengths = {len(n) for n in names}
        if len(lengths) > 1:
            raise ValueError(f"all examples need the same number of positions, got lengths {sorted(lengths)}")
        return cls(torch.tensor([role_ids(n) for n in names], dtype=torch.long), tail_role)

    @classmethod
    def uniform(cls, batch: int, pos: int, role: str = "text", tail_role: str | None = None) -> TokenLayout:
        """Every position has the same role."""
        return cls(torch.full((batch, pos), role_ids([role])[0]), tail_role)

    @classmethod
    def from_attention_mask(
        cls, attention_mask: torch.Tensor, role: str = "text", tail_role: str | None = None
    ) -> TokenLayout:
        """``role`` where ``attention_mask`` is 1, ``pad`` where it is 0."""
        roles = torch.where(attention_mask.bool(), role_ids([role])[0], ROLE_ID["pad"])
        return cls(roles.long(), tail_role)

    # -- shape --------------------------------------------------------------------------
    @property
    def batch(self) -> int:
        return self.roles.shape[0]

    @property
    def length(self) -> int:
        return self.roles.shape[1]

    def roles_at(self, start: int, length: int) -> torch.Tensor:
        """Roles of positions ``start .. start+length-1`` → ``[batch, length]``.

        Positions past the layout take ``tail_role``; without one they raise.
        """
        end = start + length
        if end <= self.length:
            return self.roles[:, start:end]
        if self.tail_role is None:
            raise ValueError(
                f"positions {start}..{end - 1} are past the layout's {self.length} positions; "
                "pass tail_role (e.g. 'image_gen' for generation) or a longer layout"
            )
        inside = self.roles[:, start : self.length] if start < self.length else self.roles[:, :0]
        tail = torch.full(
            (self.batch, end - max(start, self.length)), ROLE_ID[self.tail_role], dtype=torch.long
        )
        return torch.cat([inside, tail], dim=1)

    def extend(self, n: int, role: str | None = None) -> TokenLayout:
        """A new layout with ``n`` more positions of ``role`` (default ``tail_role``)."""
        role = role or self.tail_role
        if role is None:
            raise ValueError("extend needs a role (or a layout with tail_role)")
        role_ids([role])  # an unknown role raises, naming the valid ones
        return TokenLayout(
            self.roles_at(0, self.length + n)
            if role == self.tail_role
            else torch.cat([self.roles, torch.full((self.batch, n), ROLE_ID[role], dtype=torch.long)], dim=1),
            self.tail_role,
        )

    def repeat(self, times: int) -> TokenLayout:
        """Stack the batch ``times`` (classifier-free guidance doubles the batch)."""
        return TokenLayout(self.roles.repeat(times, 1), self.tail_role)

    # -- selection ----------------------------------------------------------------------
    def mask(self, roles: str | Iterable[str]) -> torch.Tensor:
        """Boolean ``[batch, pos]``: True where the role is one of ``roles``."""
        ids = role_ids([roles] if isinstance(roles, str) else roles)
        return torch.isin(self.roles, torch.tensor(ids, dtype=torch.long))

    def positions(self, example: int, roles: str | Iterable[str]) -> list[int]:
        """Positions of example ``example`` whose role is in ``roles``."""
        return self.mask(roles)[example].nonzero().flatten().tolist()

    def counts(self) -> dict[str, int]:
        """Number of positions of each role over the whole batch."""
        return {name: int((self.roles == i).sum()) for i, name in enumerate(ROLES)}

    def names(self, example: int) -> list[str]:
        """Role names of one example's positions."""
        return [ROLES[i] for i in self.roles[example].tolist()]

    def to_json(self) -> dict:
        """Plain-JSON form (lists of role ids), for manifests."""
        return {"roles": self.roles.tolist(), "tail_role": self.tail_role, "role_names": list(ROLES)}

    @classmethod
    def from_json(cls, data: dict) -> TokenLayout:
        if data.get("role_names", list(ROLES)) != list(ROLES):
            raise ValueError(
                f"layout was written with roles {data['role_names']}, this toolkit has {list(ROLES)}"
            )
        return cls(torch.tensor(data["roles"], dtype=torch.long), data.get("tail_role"))
