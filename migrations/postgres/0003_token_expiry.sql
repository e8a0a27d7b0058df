-- Live rotation: a token replaced in a running container stays valid until
-- expires_at (the overlap window), then is revoked with reason `rotated`.
ALTER TABLE workspace_auth_tokens ADD COLUMN expires_at TIMESTAMPTZ;
