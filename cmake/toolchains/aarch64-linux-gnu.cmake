# Cross-compilation for 64-bit ARM Linux with Debian's / Ubuntu's cross toolchain
# (apt-get install g++-aarch64-linux-gnu; libgomp for aarch64 comes with it, so OpenMP works).
#   cmake -S tests/cpp -B build/cpp-aarch64 -DCMAKE_TOOLCHAIN_FILE=cmake/toolchains/aarch64-linux-gnu.cmake
# Run the results with qemu-user: qemu-aarch64 -L /usr/aarch64-linux-gnu build/cpp-aarch64/core_test
set(CMAKE_SYSTEM_NAME Linux)
set(CMAKE_SYSTEM_PROCESSOR aarch64)

set(CMAKE_C_COMPILER aarch64-linux-gnu-gcc)
set(CMAKE_CXX_COMPILER aarch64-linux-gnu-g++)

# Headers and libraries of the target come from the cross sysroot; programs from the host.
set(CMAKE_FIND_ROOT_PATH /usr/aarch64-linux-gnu)
set(CMAKE_FIND_ROOT_PATH_MODE_PROGRAM NEVER)
set(CMAKE_FIND_ROOT_PATH_MODE_LIBRARY ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_INCLUDE ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_PACKAGE ONLY)

# try_run / ctest / add_custom_command(... $<TARGET_FILE:..>) run target binaries through qemu.
find_program(PYECCV_QEMU_AARCH64 qemu-aarch64)
if(PYECCV_QEMU_AARCH64)
  set(CMAKE_CROSSCOMPILING_EMULATOR "${PYECCV_QEMU_AARCH64};-L;/usr/aarch64-linux-gnu")
endif()
