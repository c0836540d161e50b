"""HTTP shapes of workflows and their runs (Port's)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class WorkflowBody(BaseModel):
    """Port's workflow: `nodes` (triggers, actions, conditions, each `{identifier, config:
    {type, ...}, variables?}`) and `connections` (`{sourceIdentifier, targetIdentifier,
    sourceOutletIdentifier?, fallback?}`). The whole graph is checked (docs/workflows.md)."""

    model_config = ConfigDict(extra="allow")

    identifier: Any = Field(default=None, description="letters, digits and @_:- (at most 60)")
    title: Any = None
    icon: Any = None
    description: Any = None
    category: Any = None
    allowAnyoneToViewRuns: Any = Field(default=None, description="true (default) or false")
    nodes: Any = None
    connections: Any = None


class Workflow(BaseModel):
    model_config = ConfigDict(extra="allow")

    identifier: str
    allowAnyoneToViewRuns: bool
    nodes: list[dict[str, Any]]
    connections: list[dict[str, Any]]
    versionIdentifier: str
    version: int
    createdAt: datetime
    createdBy: str
    updatedAt: datetime
    updatedBy: str


class WorkflowResponse(BaseModel):
    ok: Literal[True] = True
    workflow: Workflow


class WorkflowListResponse(BaseModel):
    ok: Literal[True] = True
    workflows: list[Workflow]


class RunBody(BaseModel):
    """`inputs` (or `properties`): the trigger's user inputs; `triggerIdentifier`: which
    self-serve trigger, when the workflow has more than one."""

    model_config = ConfigDict(extra="allow")

    inputs: dict[str, Any] | None = None
    properties: dict[str, Any] | None = None
    triggerIdentifier: str | None = Field(default=None, max_length=100)


class ResponseBody(BaseModel):
    """A response to an INPUT node: `button` (its identifier; optional when the node has
    one button) and `inputs` (the node's `userInputs`)."""

    model_config = ConfigDict(extra="allow")

    button: str | None = Field(default=None, max_length=100)
    inputs: dict[str, Any] | None = None


class NodeRun(BaseModel):
    model_config = ConfigDict(extra="allow")

    identifier: str
    node: dict[str, Any]
    nodeConfigType: str
    status: Literal["IN_PROGRESS", "COMPLETED"]
    result: Literal["SUCCESS", "FAILED", "CANCELLED"] | None
    output: Any = None
    nodeRunLogs: list[dict[str, Any]]
    createdAt: datetime
    updatedAt: datetime
    completedAt: datetime | None


class WorkflowRun(BaseModel):
    model_config = ConfigDict(extra="allow")

    identifier: str
    workflow: dict[str, Any]
    status: Literal["IN_PROGRESS", "COMPLETED"]
    result: Literal["SUCCESS", "FAILED", "CANCELLED"] | None
    createdBy: str
    createdAt: datetime
    updatedAt: datetime
    completedAt: datetime | None
    nodeRuns: list[NodeRun] | None = None


class WorkflowRunResponse(BaseModel):
    ok: Literal[True] = True
    workflowRun: WorkflowRun


class WorkflowRunListResponse(BaseModel):
    ok: Literal[True] = True
    workflowRuns: list[WorkflowRun]
