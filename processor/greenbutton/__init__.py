"""Green Button "Download My Data" files: ESPI XML feeds, utility CSV downloads, ZIPs of both."""
