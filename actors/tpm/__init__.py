"""The TPM worker actor (tpmd): one OS thread owns the TPM's ESAPI context (`device`), the
actor in front of it (`worker`) opens it with backoff and serves `protocol.Tpm`."""
