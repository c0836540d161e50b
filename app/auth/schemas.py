"""Request and response shapes of the auth routes (Port's)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class AccessTokenRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    clientId: str = Field(min_length=1, max_length=200)
    clientSecret: str = Field(min_length=1, max_length=500)


class AccessTokenResponse(BaseModel):
    ok: Literal[True] = True
    accessToken: str
    expiresIn: int = Field(description="Seconds until the access token expires")
    tokenType: Literal["Bearer"] = "Bearer"
