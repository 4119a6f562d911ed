"""Mail storage behind a narrow interface (Maildir)."""
