# tcp_client.py

import socket

def tcp_client():
    client_socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server_address = ("127.0.0.1", 12345)
    client_socket.connect(server_address)

    try:
        # 发送数据
        message = "hello, server".encode()
        client_socket.sendall(message)

        # 接收响应
        data = client_socket.recv(1024)
        print(f"received from server: {data.decode()}")

        # 发送退出消息
        exit_message = "exit".encode()
        client_socket.sendall(exit_message)

    finally:
        client_socket.close()

if __name__ == "__main__":
    tcp_client()


