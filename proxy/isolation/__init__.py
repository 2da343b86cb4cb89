"""``shadow.isolation = "process"``: the candidate's side in a shadow process, off the serving event loop."""
