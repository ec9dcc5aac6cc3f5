from medldm.cli import app

app()
