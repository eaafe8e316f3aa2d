"""What both kinds of test use: fakes, a scripted LLM server, a cutting proxy, worker helpers."""
