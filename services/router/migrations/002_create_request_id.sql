-- AIP-155 for CreateProvider: the request_id that created a provider, and a fingerprint of that request, so a
-- retried create returns the provider it made instead of ALREADY_EXISTS.
ALTER TABLE router.providers
    ADD COLUMN create_request_id text NOT NULL DEFAULT '',
    ADD COLUMN create_fingerprint bytea;
