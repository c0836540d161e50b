"""The organization's people: users and teams (`/v1/users`, `/v1/teams`)."""
