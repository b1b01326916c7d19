-- Provider secrets sealed at rest (libs/common/secret_box.py, keys from ESP_SECRETS_KEYS): the credentials and the
-- webhook signing secrets are stored only as AES-GCM envelopes bound to 'router.provider_credentials/<id>' and
-- 'router.provider_webhook_secrets/<id>'. The router seals any plain `credentials` left by earlier versions when it
-- starts (a migration cannot: it has no key) and empties the column; from then on it stays '{}', and a later
-- migration can drop it once every deployment has run such a router.
ALTER TABLE router.provider_credentials
    ADD COLUMN sealed_credentials bytea,
    ADD COLUMN sealed_webhook_secrets bytea,
    ADD COLUMN webhook_secret_names text[] NOT NULL DEFAULT '{}';

COMMENT ON COLUMN router.provider_credentials.credentials IS
    'Deprecated: plain credentials of routers before sealing; emptied (''{}'') by the router at start.';
