"""Operations: the deployment file, local and per-host processes, redeploys, systemd units, the demo."""
