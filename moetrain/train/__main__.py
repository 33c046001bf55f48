from moetrain.train.cli import run

run()
