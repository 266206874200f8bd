"""What the tests stand on: stand-ins for DT's services, PostgreSQL and the real server, signing, apart from the tests."""
