"""The test bed the tests, benchmarks and demo stand on.

    stack              a redis-server and one `ferry worker` per host, on this machine
    fleet              hosts in their own network namespaces, with their own addresses
    fleet_scale        many moves at once on a fleet, and the watch that no guest runs twice
    guestimage         the test guest (guest/ asm sources), built with binutils
    guestxml           domain XML for the test guest
    flowerctl          start Flower and read it
    flower_screenshot  the picture in docs/ (`python -m scripts.testbed.flower_screenshot`)
"""
