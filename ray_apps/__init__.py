"""Ray Serve applications (`import_path: ray_apps.<module>:app`)."""
