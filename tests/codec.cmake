# Codec: round trips, cereal user types, corrupt and fuzzed input.
multiproc_add_test(test_codec SOURCES codec_test.cpp TIMEOUT 60)
