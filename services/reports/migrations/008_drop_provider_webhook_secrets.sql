-- Provider webhook secrets are no longer kept by reports, nor in plain text anywhere: they are set with the
-- router's admin RPCs (Provider.webhook_secrets, write-only), sealed with ESP_SECRETS_KEYS in
-- router.provider_credentials, and reach reports through the provider catalog (services/reports/provider_secrets.py).
-- Before applying this on a deployment that filled the table, set each row's secrets with UpdateProvider
-- (docs/DEPLOYMENT.md, "Secrets").
DROP TABLE IF EXISTS reports.provider_webhook_secrets;
