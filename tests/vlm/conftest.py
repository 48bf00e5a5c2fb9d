import pytest
from dlmcache.vlm.tiny import tiny_processor


@pytest.fixture(scope="module")
def processor():
    return tiny_processor()
